"""What models exist: catalog rules, the database, sources and the lock file."""
