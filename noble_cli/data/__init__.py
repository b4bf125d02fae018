"""Language-model data: the offline `embedded` corpus (corpus.py), GPT-2 BPE without a hub (tokenizer.py), uint16
token shards with a fixed validation split (shards.py), HF `datasets` / local files for online users (hf_text.py),
the resumable `LMDataModule` (lm_datamodule.py) and the `noble data` commands (cli.py)."""
