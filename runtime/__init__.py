"""One process's view of a registry: the context that wires the catalogue's stores, the artifact store, the
service endpoints and the backbone cache, and the operations that need all of them (registering tasks,
catalogued retrievers, embedding the Expert Library)."""
