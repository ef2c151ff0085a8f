"""What the GPU costs: billing arithmetic over recorded history (`billing`) and a what-if simulator (`simulator`)."""
