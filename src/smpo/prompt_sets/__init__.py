"""Prompt sets shipped with smpo (data only; read them with :func:`smpo.prompts.load_prompts`).

- ``parti/``: Parti-Prompts (Yu et al. 2022), 1,632 prompts, Apache-2.0 (LICENSE and SOURCE.txt beside it).
"""
