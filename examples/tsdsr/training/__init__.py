"""TSD-SR training pieces: models, batches by step, one iteration, validation."""
