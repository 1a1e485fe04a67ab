"""What a prunable layer is and which ones to prune: schemes, rank rules, targets, eligibility, adapters,
attention hosts, selection and spectral (SVD) helpers."""
