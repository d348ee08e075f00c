"""The stdio keeper: holds programs' output pipes so that programs outlive a killed supervisor."""
