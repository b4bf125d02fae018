from noble_cli.cli import main

main()
