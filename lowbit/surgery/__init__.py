"""Model surgery: rewrites of the model itself that keep its function — SmoothQuant's scales and RPTQ's channel
permutations folded into neighbouring weights and norms (``activations`` calibrates what they fold)."""
