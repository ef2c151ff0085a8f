"""What the GPU costs: billing over recorded history (`billing`) and a what-if simulator (`simulator`)."""
