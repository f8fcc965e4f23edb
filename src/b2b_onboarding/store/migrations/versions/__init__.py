"""The state store's revisions, oldest first: Alembic reads these files; setuptools packages them."""
