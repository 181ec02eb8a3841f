"""Human feedback: the review queue, corrections, annotations and labelled exports."""
