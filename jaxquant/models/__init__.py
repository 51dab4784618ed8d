"""Real models jaxquant ships loaders for (integration code, not the array core)."""
