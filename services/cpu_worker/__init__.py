"""CPU worker: the shared engine on the CPU, for offloaded requests."""
