"""maskprop dataset sink: propagated labels -> JSONL shards (exactly once) -> COCO export."""
