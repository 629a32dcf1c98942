"""The controller: the mesh's certificate authority, registry and API."""
