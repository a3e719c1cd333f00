"""Generation on held-out questions and answer judging."""
