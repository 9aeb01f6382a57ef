"""Built-in federated tasks, one module per data source."""
