"""Who may connect: tokens, the gate (Host, Origin, token) and the `cortex token` command."""
