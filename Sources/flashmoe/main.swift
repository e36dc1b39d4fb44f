import FlashMoECLI

FlashMoECommand.main()
