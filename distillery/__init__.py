"""distillery: a server for distilled diffusion models, and the distillers that make its adapters."""
