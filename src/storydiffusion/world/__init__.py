"""The tiny world: a procedurally drawn world of characters with known ground truth, the tiny model
family trained on it (the embedded default model) and the measuring instruments built on it (attribute
classifier, `storydiffusion eval`, `eval-video`). Not the product: it measures it."""
