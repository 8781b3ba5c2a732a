"""Architecture support; x86_64 is the only one so far."""
