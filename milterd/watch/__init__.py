"""The partner certificate watch (#18): certificates partners present, and probes of send partners' MX hosts."""
