"""The functional core: pure values and decisions. Imports nothing from adapters, pipeline or app."""
