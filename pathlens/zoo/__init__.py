"""Small pretrained models with known circuits, shipped as acceptance tests for interpretability methods."""
