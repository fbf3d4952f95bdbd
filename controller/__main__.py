import sys

if __name__ == "__main__":
    # Imported here, not at the top: processes spawned by the supervisor re-import this module
    # (as __mp_main__) and must not pay for the supervisor's imports.
    from shoal.controller.main import main

    sys.exit(main())
