"""`cortex chat`: the terminal client."""
