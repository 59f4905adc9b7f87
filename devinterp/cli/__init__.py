"""Commands: ``devinterp fit | analyze | dependence | sweep | llc | language``; the only layer that
imports both callbacks and analysis (docs/architecture.md)."""
