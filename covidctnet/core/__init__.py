"""Foundations every stage uses: typed errors, config dataclasses, labels, file helpers, seeding, device, model
directories. Imports nothing else of covidctnet."""
