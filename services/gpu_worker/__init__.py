"""GPU worker: the shared engine on CUDA, consuming the ``gpu`` pool's queue."""
