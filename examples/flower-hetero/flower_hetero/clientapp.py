"""The ClientApp: fine-tunes the client's small model on its share of one task (its SuperNode's
`partition-id`) and sends back LoRA factors, base identity and data statistics."""

from hetfed.flower import client_app

app = client_app()
