"""Pure loss functions of tensors, each returning (loss, metric sums) and citing its equation:
`sft` (Eq. 1), `reward` (Eq. 2), `alignment` (Eqs. 4-6), `preference` (DPO, IPO, cDPO)."""
