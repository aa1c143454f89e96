"""Training and evaluation: datasets, transforms, recipes, metrics, plots, the train/evaluate engine."""
