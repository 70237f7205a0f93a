"""Ollama's API: ``/api/chat`` and ``/api/generate`` (`client`), the discovery routes
(`discovery`) and the pieces both read (`content`)."""
