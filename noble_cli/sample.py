"""placeholder"""
def sample():
    """Print text sampled from a causal-LM run."""
