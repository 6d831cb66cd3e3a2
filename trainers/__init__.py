"""Command-line trainers: `python -m trainers.fit`, `trainers.evaluate`, `trainers.sample`."""
