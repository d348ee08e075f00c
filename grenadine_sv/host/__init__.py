"""What this host can do: facts from the kernel and CRIU, and the doctor that judges them."""
