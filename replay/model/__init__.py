"""Layer 2, what is modelled: SEV-SNP constants, the guest's CPU demand and quota, the kernel capability
profiles. Imports only ``replay.core``."""
