"""What turns the BYOL step into a run: processes (DDP), checkpoints, preemption, metrics, argument checks."""
