"""The probes as pure tensor functions (no options, files or devices): instantaneous gaps, forward-backward, window
plans, and the row bookkeeping they share. ``critsample.detect`` turns them into stored units and windows."""
