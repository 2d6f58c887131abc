"""Scoring a retriever: models checked and encoded in the right precision, LAReQA metrics per query,
the noisy-query report, console tables and plots, and MTEB tasks."""
