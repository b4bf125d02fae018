"""Training: `run.train` (one run into its folder), the recorder that keeps the folder, the folder itself."""

# Set while a run trains, in its process and (inherited) in the processes Lightning's DDP launcher spawns for it;
# here, not in run.py, so that the sweep launcher can read it without importing Lightning.
PREPARED_ENV = "NOBLE_PREPARED_RUN"
