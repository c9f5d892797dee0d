"""Topic declarations of the reference mesh: ``mesh topics apply`` creates them."""
