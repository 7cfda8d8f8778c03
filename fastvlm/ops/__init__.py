"""One module per op family: formula, naive reference, torch path and autograd Function side by side."""
