<?php
// Rendered by bgagent. Do not edit: the next deployment renders it again from SSM
// Parameter Store (`bgagent status` shows which parameter versions it was rendered from).
return [
    'backend' => [
        'frontName' => 'admin_example',
    ],
    'crypt' => [
        'key' => '00000000000000000000000000000000',
    ],
    'db' => [
        'table_prefix' => '',
        'connection' => [
            'default' => [
                'host' => '127.0.0.1',
                'dbname' => 'magento',
                'username' => 'magento',
                'password' => 'example-db-password',
                'model' => 'mysql4',
                'engine' => 'innodb',
                'initStatements' => 'SET NAMES utf8;',
                'active' => '1',
            ],
        ],
    ],
    'resource' => [
        'default_setup' => [
            'connection' => 'default',
        ],
    ],
    'x-frame-options' => 'SAMEORIGIN',
    'MAGE_MODE' => 'production',
    'session' => [
        'save' => 'redis',
        'redis' => [
            'host' => '127.0.0.1',
            'port' => '6379',
            'database' => 2,
            'disable_locking' => '0',
        ],
    ],
    'cache' => [
        'frontend' => [
            'default' => [
                'id_prefix' => 'shop_1_',
                'backend' => 'Magento\\Framework\\Cache\\Backend\\Redis',
                'backend_options' => [
                    'server' => '127.0.0.1',
                    'port' => '6379',
                    'database' => 3,
                ],
            ],
            'page_cache' => [
                'id_prefix' => 'shop_1_',
                'backend' => 'Magento\\Framework\\Cache\\Backend\\Redis',
                'backend_options' => [
                    'server' => '127.0.0.1',
                    'port' => '6379',
                    'database' => 4,
                ],
            ],
        ],
    ],
    'deployment' => [
        'blue_green' => [
            'enabled' => true,
        ],
    ],
    'install' => [
        'date' => 'Sun, 22 Nov 2026 12:00:00 +0000',
    ],
];
