"""Lightning callbacks of xrec-pl."""
