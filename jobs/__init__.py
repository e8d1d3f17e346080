"""Vehicle image similarity search on Spark: one module per job, shared code beside them."""
