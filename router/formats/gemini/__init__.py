"""Gemini ``generateContent``: the client side (`client`), the upstream side (`upstream`), the
content both share (`content`) and its schemas in both directions (`schema`)."""
