"""Model implementations. Model files know nothing about serving."""
