"""Certificate tooling: `milterd cert request|import|list|check`."""
