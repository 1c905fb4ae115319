"""Pure loss functions of tensors, each returning (loss, metric sums) and citing its equation."""
