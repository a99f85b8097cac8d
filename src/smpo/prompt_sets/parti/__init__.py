"""Parti-Prompts: PartiPrompts.tsv copied unchanged from google-research/parti (see SOURCE.txt, LICENSE)."""
