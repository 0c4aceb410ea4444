"""`hack report`: the Markdown report and figures built from results/."""
